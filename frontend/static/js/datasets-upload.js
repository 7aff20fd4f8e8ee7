// Dataset upload page: sends the archive to POST /api/v1/datasets with XHR (progress events),
// the session's CSRF token in the X-CSRF-Token header; shows percent, speed and time left,
// then opens the dataset's page, where validation progress is shown live.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form) return;
  var bar = document.getElementById("upload-bar");
  var text = document.getElementById("upload-text");
  var box = document.getElementById("upload-progress");
  var error = document.getElementById("upload-error");

  function human(bytes) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
    return (i === 0 ? bytes.toFixed(0) : bytes.toFixed(1)) + " " + units[i];
  }
  function duration(seconds) {
    if (!isFinite(seconds)) return "…";
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + " s";
    var m = Math.floor(seconds / 60), s = seconds % 60;
    if (m < 60) return m + " min " + s + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }
  function fail(message) {
    error.textContent = message;
    error.hidden = false;
    form.querySelector("button").disabled = false;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    error.hidden = true;
    var file = document.getElementById("upload-file").files[0];
    var name = document.getElementById("upload-name").value.trim();
    if (!file || !name) { fail("Choose a file and give the dataset a name."); return; }
    if (file.size > Number(form.dataset.maxBytes)) {
      fail("The file is " + human(file.size) + "; the limit is " + human(Number(form.dataset.maxBytes)) + ".");
      return;
    }
    if (file.size > Number(form.dataset.leftBytes)) {
      fail("The file is " + human(file.size) + " but only " + human(Number(form.dataset.leftBytes)) + " of your quota is left.");
      return;
    }
    var data = new FormData();
    data.append("name", name);  // before the file: the server reads the form as a stream
    data.append("file", file);
    var xhr = new XMLHttpRequest();
    var started = Date.now();
    xhr.open("POST", "/api/v1/datasets");
    xhr.setRequestHeader("X-CSRF-Token", form.dataset.csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      var seconds = (Date.now() - started) / 1000;
      var speed = seconds > 0 ? e.loaded / seconds : 0;
      bar.value = Math.round(100 * e.loaded / e.total);
      text.textContent = bar.value + "% · " + human(e.loaded) + " of " + human(e.total) +
        " · " + human(speed) + "/s · " + duration(speed > 0 ? (e.total - e.loaded) / speed : Infinity) + " left";
    });
    xhr.addEventListener("load", function () {
      var body = null;
      try { body = JSON.parse(xhr.responseText); } catch (ignored) { body = null; }
      if (xhr.status === 201 && body) {
        text.textContent = "Uploaded; validating…";
        window.location.assign("/datasets/" + body.id);
      } else {
        var detail = body && typeof body.detail === "string" ? body.detail : "The upload failed (HTTP " + xhr.status + ").";
        box.hidden = true;
        fail(detail);
      }
    });
    xhr.addEventListener("error", function () { box.hidden = true; fail("The connection was lost during the upload. Try again."); });
    form.querySelector("button").disabled = true;
    box.hidden = false;
    bar.value = 0;
    text.textContent = "Starting…";
    xhr.send(data);
  });
})();
