from leaklab.cli.main import main

main()
