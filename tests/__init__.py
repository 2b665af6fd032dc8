"""optkit's test suite, a package so that test modules import shared code as ``tests.helpers``.

pytest's default (prepend) import mode puts the directory above this package on ``sys.path``, so
``from tests.helpers import ...`` works from any working directory with no path editing.
"""
