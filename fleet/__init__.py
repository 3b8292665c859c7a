"""edgesdk's fleet manager (issue 4)."""
