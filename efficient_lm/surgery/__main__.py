from efficient_lm.surgery.cli import main

main()
