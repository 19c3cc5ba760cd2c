"""The package list for setuptools (the rest of the metadata is in pyproject.toml).

`seqpar` is src/ and `seqpar.configs` the repository's configs/ (pyproject's package-dir maps both); every
package under src/ is found here, so a new subpackage ships without editing a list.
"""

from setuptools import find_packages, setup

setup(packages=["seqpar", *(f"seqpar.{name}" for name in find_packages("src")), "seqpar.configs"])
