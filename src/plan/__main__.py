"""`python -m seqpar.plan ...`: the planner's command line (`seqpar.plan.cli`)."""

from seqpar.plan.cli import main

if __name__ == "__main__":
    main()
