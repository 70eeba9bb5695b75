"""Point-cloud utilities: reading and writing point-cloud files."""

from jsparse.utils._io import read_points as read_points
from jsparse.utils._io import write_points as write_points
