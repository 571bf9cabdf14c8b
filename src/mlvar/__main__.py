from mlvar.cli import main

main()
