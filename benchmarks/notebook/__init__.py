"""sitq in a real Jupyter kernel against dask.distributed, ipyparallel and a bare process pool.

Run ``python -m benchmarks.notebook``; ``systems.py`` holds the cells each system runs and
``__main__.py`` runs them in fresh kernels through nbclient and prints (or writes) the table.
"""
