"""Other servers run on the same bench as charstream: each one the way its own users would write it."""
