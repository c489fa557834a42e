// node-postgres through Waypoint (run by tests/test_e2e_clients.py: node session.js SPEC).
// SPEC is JSON: {host, port, database, user, ssl: false | {ca?: PEM}, expect: {tls, value, role_prefix}}.
// It runs a simple query, a parameterized one (the extended protocol), an INSERT the grant
// denies, and checks each; prints one JSON line of what it saw and exits 1 on any mismatch
// (2 when it could not run at all).
"use strict";

const { Client } = require("pg");
const tls = require("tls");

async function main(spec) {
  const problems = [];
  const ssl = spec.ssl === false ? false : { rejectUnauthorized: Boolean(spec.ssl.ca), ca: spec.ssl.ca };
  const client = new Client({
    host: spec.host,
    port: spec.port,
    database: spec.database,
    user: spec.user,
    ssl,
    connectionTimeoutMillis: 20000,
    query_timeout: 20000,
  });
  await client.connect();
  const seen = {};
  try {
    seen.tls = client.connection.stream instanceof tls.TLSSocket;
    const simple = await client.query("select current_user as u");
    seen.user = simple.rows[0].u;
    const extended = await client.query("select v, $1::int + 1 as n from t where id = $2", [41, 1]);
    seen.value = extended.rows[0].v;
    seen.n = extended.rows[0].n;
    try {
      await client.query("insert into t values ($1, $2)", [54, "x"]);
      seen.insert = "inserted";
    } catch (err) {
      seen.insert = err.code || String(err);
    }
    // The session is still usable after the denied statement.
    seen.after = (await client.query("select 1 as one")).rows[0].one;
  } finally {
    await client.end();
  }
  const expect = spec.expect;
  if (seen.tls !== expect.tls) problems.push(`tls ${seen.tls}, expected ${expect.tls}`);
  if (typeof seen.user !== "string" || !seen.user.startsWith(expect.role_prefix))
    problems.push(`current_user ${seen.user}, expected a role starting ${expect.role_prefix}`);
  if (seen.value !== expect.value) problems.push(`value ${seen.value}, expected ${expect.value}`);
  if (seen.n !== 42) problems.push(`parameterized result ${seen.n}, expected 42`);
  if (seen.insert !== "42501") problems.push(`insert gave ${seen.insert}, expected 42501`);
  if (seen.after !== 1) problems.push(`select after the denied insert gave ${seen.after}`);
  console.log(JSON.stringify({ seen, problems }));
  return problems.length === 0 ? 0 : 1;
}

let spec;
try {
  spec = JSON.parse(process.argv[2]);
} catch (err) {
  console.error(`usage: node session.js SPEC_JSON (${err.message})`);
  process.exit(2);
}
main(spec).then(
  (code) => process.exit(code),
  (err) => {
    console.error(err && err.stack ? err.stack : String(err));
    process.exit(2);
  },
);
