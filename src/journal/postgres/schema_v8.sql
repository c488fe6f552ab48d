-- Version 8: lets a statement abort its transaction as a serialization failure (SQLSTATE
-- 40001) when what a writer assumed without reading it did not hold (writer/bulk.rs, the
-- batch sent in one round trip). The writer then runs the batch again the careful way.
CREATE OR REPLACE FUNCTION knutepunkt_raced(what TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'a concurrent transaction changed %', what USING ERRCODE = '40001';
END
$$;
