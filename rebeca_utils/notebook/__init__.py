"""Last stage, what notebooks use to tell the story: run folders and manifests, plots, the setup report."""
