-- Run once by the postgres image, on its first start with an empty data volume
-- (files in /docker-entrypoint-initdb.d are skipped when the database already exists).
-- The "airflow" database (Airflow's metadata) is created by POSTGRES_DB.

-- The provider's served-models registry (AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN).
CREATE DATABASE modeldeploy OWNER airflow;

-- The MLflow tracking server's backend store.
CREATE DATABASE mlflow OWNER airflow;
