"""Triggers: waits handed to Airflow's triggerer."""
