"""The RL-vs-CFG benchmark harness behind `diffenv compare`: per-task evaluation (`evaluation`, with the task
protocols), the comparison itself (`compare`) and its report (`report`: results.csv/.md and plots)."""
