"""The run pipeline: the command line, a run (pre-train, evaluate, report), evaluation only, run folders."""
