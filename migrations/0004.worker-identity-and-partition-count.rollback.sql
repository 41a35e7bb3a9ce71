DROP TABLE cluster_config;
ALTER TABLE workers DROP COLUMN incarnation;
