"""Reports: runs side by side.

    compare.py   `convobot compare`: a table and plots over run dirs, sweep dirs or an MLflow store
    sweep.py     the same report written into a sweep dir when a multirun ends (a Hydra callback)
"""
