"""The commands of the `street2shop` CLI, one module per job; `street2shop.cli` gathers them into one group.

A new command goes in the module of its job (or a new one) and in that module's ``COMMANDS``. Commands
parse and call: the work is in `street2shop.pipeline`, `street2shop.engine`, `benchmarks` and the layers below.
"""
