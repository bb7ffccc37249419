"""The main job: a Bayesian universal differential equation for predator–prey data."""
