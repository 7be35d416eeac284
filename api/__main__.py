from inferpool.api.server import main

main()
