"""Figures: reconstructions during pretraining, attention maps for the paper's Fig. 7-10 and 14."""
