from dqprof.cli import main

main()
