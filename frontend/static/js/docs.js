// Starts Swagger UI on /docs (a separate file because the CSP forbids inline scripts).
window.addEventListener("DOMContentLoaded", function () {
  "use strict";
  var node = document.getElementById("swagger-ui");
  window.SwaggerUIBundle({
    url: node.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    deepLinking: true,
  });
});
