"""Continuous training and deployment of ML models from Apache Airflow.

Heavy libraries (mlflow, kubernetes, sklearn, pandas) are imported inside the functions that need
them, never at module import: DAG files importing this package are parsed constantly.
"""

from __future__ import annotations

__version__ = "0.1.0"
