// Renders the API document served at /openapi.json. Swagger UI 5 (from the
// swagger-ui-dist npm package, licence in LICENSE.swagger-ui) is embedded in
// the binary, so /docs works without any network access.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#docs",
  deepLinking: true,
  persistAuthorization: true,
  displayRequestDuration: true,
});
