from tdstore.cli import main

main()
