"""The HTTP front: KServe v2 REST, job endpoints and a page for people, beside gRPC."""
