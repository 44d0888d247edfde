"""Studies that train models and measure them: the layer above bixt.train and bixt.measure.

accuracy: the training comparison behind `bixt compare --data` (accuracy, with seeds, against the cost).
plots: its accuracy-against-cost plots.
"""
