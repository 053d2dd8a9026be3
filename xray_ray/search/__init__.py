"""How the search is wired: the command (``command``, ``python -m xray_ray.search``) and all that only it
uses: flags, spaces, the tuner, one trial and its loop, the results tables, the run folder, how Ray is
started and sized."""
