// The admin page's script: served by the router, nothing fetched from elsewhere. The pages work
// without it; it only asks before a discard and formats a payload as JSON.
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.action.endsWith("/discard") && !window.confirm("Discard this dead letter for good?")) {
    event.preventDefault();
  }
});
document.addEventListener("click", (event) => {
  if (!event.target.classList.contains("format-json")) return;
  const area = event.target.closest("form").querySelector("textarea");
  try {
    area.value = JSON.stringify(JSON.parse(area.value), null, 2);
    area.setCustomValidity("");
  } catch (error) {
    area.setCustomValidity("not JSON: " + error.message);
    area.reportValidity();
  }
});
