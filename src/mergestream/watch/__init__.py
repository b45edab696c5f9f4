"""Merging on the fly: watch a folder, merge each checkpoint once it is completely written, and
publish the merged model after every step (`mergestream watch`); reproducible whole merges from a
recipe file (`mergestream run`).

Modules: `inbox` decides which checkpoints in the folder are complete, `journal` remembers what
the watcher decided about each one, `publish` switches exports in atomically, `watcher` is the
loop, `recipe` runs a recipe, `commands` holds the command-line entry points.
"""
