//! Lago's list pagination: `page` and `per_page` in, `meta` out.

use serde::{Deserialize, Serialize};

use super::error::ApiError;

const DEFAULT_PER_PAGE: i64 = 100;
const MAX_PER_PAGE: i64 = 1000;

/// The requested page (1-based).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct PageRequest {
    /// The page asked for (from 1).
    pub page: Option<i64>,
    /// Items per page (default 100).
    pub per_page: Option<i64>,
}

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// The page (from 1).
    pub page: i64,
    /// Items per page.
    pub per_page: i64,
}

impl PageRequest {
    /// The page, or a 422 naming the parameter that is out of range.
    pub fn validate(self) -> Result<Page, ApiError> {
        let page = self.page.unwrap_or(1);
        let per_page = self.per_page.unwrap_or(DEFAULT_PER_PAGE);
        if !(1..=MAX_PER_PAGE).contains(&per_page) {
            return Err(ApiError::invalid("per_page", "value_is_invalid"));
        }
        // The offset must fit in an i64.
        if page < 1 || (page - 1).checked_mul(per_page).is_none() {
            return Err(ApiError::invalid("page", "value_is_invalid"));
        }
        Ok(Page { page, per_page })
    }
}

impl Page {
    /// Rows to skip before this page.
    pub fn offset(&self) -> i64 {
        (self.page - 1) * self.per_page
    }

    /// Lago's `meta` object for a list of `total_count` items.
    pub fn meta(&self, total_count: i64) -> PageMeta {
        let total_pages = (total_count + self.per_page - 1) / self.per_page;
        PageMeta {
            current_page: self.page,
            next_page: (self.page < total_pages).then_some(self.page + 1),
            prev_page: (self.page > 1).then_some(self.page - 1),
            total_pages,
            total_count,
        }
    }
}

/// Lago's `meta` object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PageMeta {
    /// This page.
    pub current_page: i64,
    /// The next page, if any.
    pub next_page: Option<i64>,
    /// The previous page, if any.
    pub prev_page: Option<i64>,
    /// Pages in all.
    pub total_pages: i64,
    /// Items in all.
    pub total_count: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_of_a_middle_page_links_both_ways() {
        let page = Page {
            page: 2,
            per_page: 10,
        };
        assert_eq!(
            page.meta(25),
            PageMeta {
                current_page: 2,
                next_page: Some(3),
                prev_page: Some(1),
                total_pages: 3,
                total_count: 25
            }
        );
        assert_eq!(page.offset(), 10);
    }

    #[test]
    fn an_empty_list_has_no_pages() {
        let page = PageRequest {
            page: None,
            per_page: None,
        }
        .validate()
        .unwrap();
        assert_eq!(
            page,
            Page {
                page: 1,
                per_page: 100
            }
        );
        assert_eq!(
            page.meta(0),
            PageMeta {
                current_page: 1,
                next_page: None,
                prev_page: None,
                total_pages: 0,
                total_count: 0
            }
        );
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        let zero = PageRequest {
            page: Some(0),
            per_page: None,
        }
        .validate()
        .unwrap_err();
        assert!(matches!(zero, ApiError::Validation(ref d) if d.contains_key("page")));
        let huge = PageRequest {
            page: None,
            per_page: Some(1001),
        }
        .validate()
        .unwrap_err();
        assert!(matches!(huge, ApiError::Validation(ref d) if d.contains_key("per_page")));
    }
}
