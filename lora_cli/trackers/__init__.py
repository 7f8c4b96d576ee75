"""Experiment trackers from the recipe (`training.report_to`): transformers' own integrations do the logging; we add
what they leave out. available.py checks the names before any weights load (recipe.py calls it); run.py attaches
the recipe and lora's own figures to each tracker of a run.
"""
