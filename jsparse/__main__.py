"""``python -m jsparse``: the ``jsparse`` command (:mod:`jsparse.cli`)."""

from jsparse.cli import main

main()
