from .factory import main

main()
