"""`airflow served-models ...`: see and act on served models from the command line."""
