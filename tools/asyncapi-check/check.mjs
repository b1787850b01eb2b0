#!/usr/bin/env node
// Validate one AsyncAPI document (a file path, or stdin when none) with the official parser.
// Prints every diagnostic as JSON lines {severity, code, message, path}; exits 1 on an error.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const SEVERITY = ["error", "warning", "info", "hint"];
const source = readFileSync(process.argv[2] ?? 0, "utf8");
const { document, diagnostics } = await new Parser().parse(source);
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: SEVERITY[d.severity], code: d.code, message: d.message, path: d.path.join(".") }));
}
process.exit(document === undefined || diagnostics.some((d) => d.severity === 0) ? 1 : 0);
