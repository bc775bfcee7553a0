// Starts Swagger UI on the /docs page (served there as /docs/docs-init.js). A file of its own,
// not an inline script: the page's Content-Security-Policy allows scripts from files only.
// The URL is relative to the page, so the docs also work under a proxy's path prefix.
window.SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  // The default would show a badge image from validator.swagger.io: nothing leaves the server.
  validatorUrl: null,
  presets: [window.SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
