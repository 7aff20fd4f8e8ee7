// Small behaviours the pages need; kept in a file because the CSP forbids inline scripts.
(function () {
  "use strict";

  // Copy buttons: <button data-copy="#selector"> copies that input's value.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (button) {
      var field = document.querySelector(button.getAttribute("data-copy"));
      if (!field) return;
      var done = function () {
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = "Copy"; }, 2000);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done);
      } else {
        // Plain-HTTP deployments have no clipboard API; select the text so Ctrl-C works.
        field.select();
        document.execCommand("copy");
        done();
      }
      return;
    }
    var dismiss = event.target.closest("[data-dismiss]");
    if (dismiss) {
      dismiss.closest(".toast").remove();
    }
  });

  // Toasts fade away on their own after a while.
  function scheduleToasts(root) {
    root.querySelectorAll(".toast:not([data-scheduled])").forEach(function (toast) {
      toast.setAttribute("data-scheduled", "");
      setTimeout(function () { toast.remove(); }, 8000);
    });
  }
  document.addEventListener("DOMContentLoaded", function () { scheduleToasts(document); });
  document.addEventListener("htmx:afterSettle", function () { scheduleToasts(document); });
})();
