package httpapi

// apiDescription opens the OpenAPI document and /docs.
const apiDescription = `agentry dispatches commands to agents, on horizontally scaled workers,
with progress streamed live.

**Authentication.** Send ` + "`Authorization: Bearer <token>`" + ` with an access token
from ` + "`POST /v1/auth/login`" + ` or an API key (` + "`agk_…`" + `).

**Organization.** Every request acts in one organization: the one named by the
` + "`X-Org-ID`" + ` header, or else the caller's default organization (an API key acts
in its own). The caller must belong to it.

**Errors.** Every error is ` + "`application/problem+json`" + ` (RFC 9457) with a stable
` + "`code`" + `, the ` + "`request_id`" + ` and, for invalid input, every bad field in ` + "`errors`" + `.
A resource the caller may not see answers 404, never 403.

**Lists.** ` + "`page`" + ` (from 1) and ` + "`page_size`" + ` (1–100, default 20); ` + "`skip_total=true`" + `
skips counting; ` + "`cursor`" + ` (from ` + "`next_cursor`" + `) pages deep without offsets;
` + "`sort=field`" + ` or ` + "`sort=-field`" + ` and the filters each list documents. (The
notifications, audit, users and queue lists take only the parameters they
document.) An operation refuses any parameter it does not document (400).

**Concurrency.** Every resource has a ` + "`version`" + ` and an ` + "`ETag`" + `; send ` + "`If-Match`" + `
on PUT, PATCH and DELETE to refuse a lost update (412). PATCH takes a JSON merge
patch (RFC 7396).`
