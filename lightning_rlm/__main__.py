from lightning_rlm.main import main

main()
