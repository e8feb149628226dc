"""Post-grad FX passes. Each is a `GraphPass`; the pass manager decides which run and in what order."""
