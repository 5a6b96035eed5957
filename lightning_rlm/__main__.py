from lightning_rlm.cli import main

main()
