from street2shop.cli import main

main()
