// Renders /openapi.json as a list of operations with their parameters and form fields (no Swagger UI, no CDN).
"use strict";

function resolve(spec, schema) {
  while (schema && schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
  return schema || {};
}

function fieldRows(spec, operation) {
  const rows = (operation.parameters || []).map((p) => [p.name, p.in, p.required ? "yes" : "", p.description || ""]);
  const content = operation.requestBody?.content || {};
  for (const [type, media] of Object.entries(content)) {
    const schema = resolve(spec, media.schema);
    const required = new Set(schema.required || []);
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      rows.push([name, type, required.has(name) ? "yes" : "", prop.description || ""]);
    }
  }
  return rows;
}

fetch("/openapi.json")
  .then((response) => response.json())
  .then((spec) => {
    const root = document.getElementById("operations");
    for (const [path, methods] of Object.entries(spec.paths)) {
      for (const [method, operation] of Object.entries(methods)) {
        const box = document.createElement("section");
        box.className = "op";
        const title = document.createElement("h3");
        const badge = document.createElement("span");
        badge.className = "method";
        badge.textContent = method.toUpperCase();
        title.append(badge, path);
        const summary = document.createElement("p");
        summary.textContent = [operation.summary, operation.description].filter(Boolean).join("\n");
        box.append(title, summary);
        const rows = fieldRows(spec, operation);
        if (rows.length) {
          const table = document.createElement("table");
          const head = table.createTHead().insertRow();
          for (const label of ["field", "in", "required", "description"]) {
            const cell = document.createElement("th");
            cell.textContent = label;
            head.append(cell);
          }
          const body = table.createTBody();
          for (const row of rows) {
            const tr = body.insertRow();
            for (const value of row) tr.insertCell().textContent = value;
          }
          box.append(table);
        }
        root.append(box);
      }
    }
  })
  .catch((error) => {
    document.getElementById("operations").textContent = `Could not load /openapi.json: ${error}`;
  });
