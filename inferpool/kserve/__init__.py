"""Generated code for the KServe v2 / Open Inference Protocol (`inference` proto package)."""
