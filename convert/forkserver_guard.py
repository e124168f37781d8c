"""Imported only by the converter's forkserver (the first of its preloaded modules): the forkserver dies
with the converter.

multiprocessing's forkserver exits when every holder of its "alive" pipe has closed it, and it hands that
pipe to every process it starts (the writer, the check pool's workers, and whatever they fork): one lingering
descendant kept it, and the resource tracker beside it, alive after the converter was killed. With this it
is killed with its parent; its children follow through their own die_with_parent.
"""
from convert.write import die_with_parent

die_with_parent()
