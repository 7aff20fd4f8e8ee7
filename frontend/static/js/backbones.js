// Weights upload with a progress bar: plain XHR (progress events), CSRF token in the header
// (the server streams the body and never parses the form to look for it).
(function () {
  "use strict";
  var form = document.getElementById("backbone-upload");
  if (!form) { return; }
  var bar = document.getElementById("backbone-progress");
  var status = document.getElementById("backbone-upload-status");
  var csrf = JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRF-Token"] || "";

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var file = form.elements.file.files[0];
    var limit = Number(form.getAttribute("data-max-bytes"));
    if (file && limit && file.size > limit) {
      status.textContent = "The file is larger than the " + Math.round(limit / 1048576) + " MiB accepted.";
      return;
    }
    var button = form.querySelector("button[type=submit]");
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.getAttribute("action"));
    xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) {
        bar.value = Math.round((100 * e.loaded) / e.total);
        status.textContent = "Uploading… " + bar.value + " %";
      }
    });
    xhr.addEventListener("load", function () {
      var body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { body = {}; }
      if (xhr.status === 201) {
        status.textContent = "Uploaded; validating…";
        window.location.href = "/backbones/" + body.id;
        return;
      }
      button.disabled = false;
      bar.hidden = true;
      var detail = body.detail;
      if (Array.isArray(detail)) { detail = detail.map(function (d) { return d.msg; }).join("; "); }
      status.textContent = "Upload refused: " + (detail || ("HTTP " + xhr.status));
    });
    xhr.addEventListener("error", function () {
      button.disabled = false;
      status.textContent = "The upload was interrupted. Check the connection and try again.";
    });
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    xhr.send(new FormData(form));
  });
})();
