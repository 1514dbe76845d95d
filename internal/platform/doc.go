// Package platform holds agentry's domain types, service interfaces and its
// error model. It imports only the standard library: every adapter (Postgres,
// HTTP, Redis) speaks in these types, and only cmd/* wires adapters together.
package platform
