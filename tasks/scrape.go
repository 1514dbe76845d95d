package tasks

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"golang.org/x/net/html"

	"github.com/agentry/agentry/internal/platform"
)

// TypeWebScrape fetches a page and returns its status, title and links
// (the seed's scrape_data).
const TypeWebScrape = "web:scrape"

// ScrapePayload is the payload of web:scrape.
type ScrapePayload struct {
	URL string `json:"url" doc:"The page: an http or https URL; private, loopback and link-local addresses are refused unless allowlisted."`
	// MaxLinks caps the links returned (default 100).
	MaxLinks int `json:"max_links,omitempty" minimum:"0" maximum:"10000" doc:"The most links to return (default 100)."`
}

// Validate checks the URL.
func (p *ScrapePayload) Validate() error {
	if p.MaxLinks < 0 || p.MaxLinks > 10000 {
		return fmt.Errorf("max_links: between 0 and 10000")
	}
	return checkURL(p.URL)
}

// ScrapeResult is what web:scrape returns.
type ScrapeResult struct {
	URL       string   `json:"url"`
	Status    int      `json:"status"`
	Title     string   `json:"title"`
	Links     []string `json:"links"`
	Truncated bool     `json:"truncated"`
}

// NewScrapeCommand is the dispatch body of a scrape.
func NewScrapeCommand(url string) Command {
	return Command{Task: TypeWebScrape, Payload: ScrapePayload{URL: url}}
}

// HandleScrape fetches the page through the worker's egress policy and
// extracts its title and absolute links.
func HandleScrape(ctx context.Context, run *Run, p ScrapePayload) (any, error) {
	max := p.MaxLinks
	if max == 0 {
		max = 100
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPayload, err)
	}
	req.Header.Set("User-Agent", "agentry-scraper/1")
	run.Progress.Report(10, "fetching "+req.URL.Redacted())
	res, err := run.Egress.Client().Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	body, truncated, err := readLimited(res.Body, run.Egress.MaxBytes())
	if err != nil {
		return nil, err
	}
	run.Progress.Report(70, "parsing")
	out := ScrapeResult{URL: res.Request.URL.String(), Status: res.StatusCode, Links: []string{}, Truncated: truncated}
	title, links := parsePage(string(body), res.Request.URL, max)
	out.Title, out.Links = title, links
	return out, nil
}

// maxTitle bounds a scraped title, in bytes.
const maxTitle = 1000

// parsePage returns the title and up to max distinct absolute http(s) links.
func parsePage(doc string, base *url.URL, max int) (string, []string) {
	z := html.NewTokenizer(strings.NewReader(doc))
	var title strings.Builder
	inTitle := false
	seen := map[string]bool{}
	links := []string{}
	for {
		switch z.Next() {
		case html.ErrorToken:
			return cleanTitle(title.String()), links
		case html.StartTagToken, html.SelfClosingTagToken:
			name, hasAttr := z.TagName()
			switch string(name) {
			case "title":
				inTitle = title.Len() == 0
			case "a":
				for hasAttr && len(links) < max {
					var key, val []byte
					key, val, hasAttr = z.TagAttr()
					if string(key) != "href" {
						continue
					}
					ref, err := url.Parse(strings.TrimSpace(string(val)))
					if err != nil {
						continue
					}
					abs := base.ResolveReference(ref)
					abs.Fragment = ""
					link := abs.String()
					if (abs.Scheme == "http" || abs.Scheme == "https") && abs.Host != "" && !seen[link] && parses(link) {
						seen[link] = true
						links = append(links, link)
					}
				}
			}
		case html.EndTagToken:
			if name, _ := z.TagName(); string(name) == "title" {
				inTitle = false
			}
		case html.TextToken:
			if inTitle && title.Len() < maxTitle {
				title.Write(z.Text())
			}
		}
	}
}

// parses reports whether link is a URL a client can follow: a page's
// href can resolve to one that does not parse again (a host with a
// malformed port, say).
func parses(link string) bool {
	_, err := url.Parse(link)
	return err == nil
}

// cleanTitle makes a page's title valid UTF-8 of at most maxTitle bytes,
// cut at a character, without surrounding space.
func cleanTitle(s string) string {
	return strings.TrimSpace(platform.Storable(strings.TrimSpace(s), maxTitle))
}

func init() {
	Register(Task[ScrapePayload]{
		Type:        TypeWebScrape,
		Description: "Fetches a web page and returns its status, title and links. Private, loopback and link-local addresses are refused unless allowlisted; redirects are re-checked; size and time are limited.",
		MaxRetries:  2,
		Timeout:     time.Minute,
		Handle:      HandleScrape,
	})
}
