-- Run once by the postgres image on an empty data directory
-- (/docker-entrypoint-initdb.d). Demo passwords: change them here, in
-- pgbouncer/userlist.txt and in the pglb configs together.
-- Passwords are stored as SCRAM-SHA-256 (password_encryption's default since 14).

-- The application's role and database, reached through pglb -> PgBouncer.
CREATE ROLE app LOGIN PASSWORD 'app-password';
CREATE DATABASE app OWNER app;

-- pglb's `query` health check: logs in through each PgBouncer to the "postgres"
-- database and runs SELECT 1. It needs nothing but LOGIN (and CONNECT, which PUBLIC
-- has on "postgres").
CREATE ROLE pglb_check LOGIN PASSWORD 'check-password' CONNECTION LIMIT 20;
